"""The data floor: records and their readers, images, the chat template's label mask, transforms, streaming,
the training dataset and collator, and the `phiclip data` checks. Imports nothing above the runtime floor."""
