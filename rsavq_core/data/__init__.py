"""Text: the bundled calibration and evaluation text as token windows, users' text files, token counts."""
