"""Model patching machinery shared by every method: paths, targets, edits."""
