"""The API's routes, one module per resource; thin functions over the shared layer."""
