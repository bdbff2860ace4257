"""The packed checkpoint: its file format, canonical bytes and the bits it stores."""
