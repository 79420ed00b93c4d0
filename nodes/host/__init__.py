"""Adapters between the pure-torch library (``models/``) and the host: our models as the host's MODEL, VAE and
managed components (model.py, components.py), the host's layer classes and dtypes (ops.py), and its model folders
(files.py).  Feature modules build their nodes on these; nothing here defines a node."""
