"""The CUDA path: a compiled C driver loop (driver.py) and CUDA-graph replay of the reverse step (graphs.py).

Nothing here touches CUDA at import time; every entry point raises
``engine.errors.BackendUnavailableError`` (naming what is missing) where it cannot run.
"""
