"""PhiClip: a Hugging Face Hub vision(-and-speech) chat model and the code that trains and serves it.

The three ``*_phiclip.py`` files are the model package that goes to the Hub; the folders beside
them are the tools, one floor per layer (``offline``, ``runtime``, ``data``, ``train`` and ``chat``, then
``evaluation``, ``export``, ``serve``, ``prepare``, ``publish``, then ``demo``; see tests/test_layers.py).
"""

from setuptools import setup

EXTRAS = {
    "qlora": ["bitsandbytes>=0.45"],
    "offline": ["gguf>=0.10"],
    "serve": [
        "gradio>=6.0,<7",
        "fastapi>=0.115",
        "uvicorn>=0.30",
        "python-multipart>=0.0.18",
        "faster-whisper>=1.1",
        "httpx",
        "llguidance>=1.0",  # response_format: JSON answers through constrained decoding
    ],
    "eval": ["pycocoevalcap>=1.2"],
    "datasets": ["datasets>=4.0"],  # Hugging Face datasets as training/eval data: Hub ids, parquet/arrow, streaming
    "test": ["pytest", "scikit-image", "scikit-learn", "playwright", "psutil", "httpx"],
}
EXTRAS["all"] = sorted({dep for deps in EXTRAS.values() for dep in deps})
# lmms-eval (the field's VLM benchmark harness) finds the `phiclip` model through the entry point below. Not in
# "all": it pins packages of its own; the project runs it in .venv-lmms (scripts/lmms_setup.sh, requirements/lmms.in).
EXTRAS["lmms"] = ["lmms-eval>=0.7.3,<0.8"]

setup(
    name="phiclip",
    version="0.2.0",
    description="Teach a chat LLM to see and listen: CLIP -> projector -> LM, as a Hugging Face Hub model package.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    py_modules=["configuration_phiclip", "modeling_phiclip", "processing_phiclip", "phiclip_cli"],
    packages=["offline", "runtime", "data", "train", "train.configs", "chat", "serve", "evaluation", "export", "prepare",
              "publish", "demo"],
    package_data={"train.configs": ["*.yaml", "accelerate/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "peft>=0.17",
        "accelerate>=1.0",
        "safetensors",
        "huggingface_hub>=1.0",
        "nltk>=3.9",
        "pillow",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "numpy",
    ],
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": ["phiclip = phiclip_cli:main"],
        "lmms_eval.models": ["phiclip = evaluation.lmms_model:manifest"],
    },
)
