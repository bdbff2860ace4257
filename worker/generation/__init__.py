"""The generation server: a GPU process that loads published artifacts and streams completions."""
