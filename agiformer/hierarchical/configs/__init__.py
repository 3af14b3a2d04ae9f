"""Named configs of the hierarchical autoencoder, one JSON file each (``agiformer.hierarchical.load_config``):
``tiny`` (one level and a top LM, 1.55M parameters, near AGIFORMER's ``tiny`` preset, for CPU runs) and ``test``
(minute, for tests). A second level is a second entry of ``levels``."""
