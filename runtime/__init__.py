"""The runtime floor, below data, training and chat: run folders, devices and dtypes, model names, Hub settings."""
