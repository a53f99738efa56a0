"""QAT techniques: for each, a torch-free config section (``<name>_config.py``, registered in
:mod:`qsearch.config.methods`) and a handler implementing the trainer's plug-in interface
(``<name>.py``, a :class:`qsearch.methods.plugin.Method`). Importing this package imports
neither torch nor any method."""
