"""Networks: DeepID, safe model loading and saving, and all weight surgery
(:mod:`.models`); custom layers; training plumbing; augmentation."""
