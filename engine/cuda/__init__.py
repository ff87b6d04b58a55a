"""The CUDA path: one reverse step captured in a CUDA graph and replayed, from Python or from
compiled drivers.

- graphs.py: ``GraphedSampler``, the capture (per batch-size bucket, static buffers) and the
  replay drivers "python" (a Python loop of graph replays), "c" and "graph_loop";
- c_loop.py: builds (into ``ddpm_engine.cache``) and loads with ctypes the C loop behind
  ``driver="c"``, kernels/csrc/c_loop.c, which launches the graph through the CUDA driver API
  (``cuGraphLaunch`` from libcuda.so.1, opened at run time); ``CudaError``; the shared build
  helpers (``cuda_home``, ``find_cudart``: the libcudart this process has mapped);
- graph_loop.py: builds and loads kernels/csrc/while_loop.cu, the whole chain as one launch of a
  conditional WHILE node (CUDA >= 12.4), sm_XX machine code plus PTX (``cuda_arch``,
  ``embedded_device_code``).

Nothing here touches CUDA at import time; every entry point raises
``engine.errors.BackendUnavailableError`` (naming what is missing) where it cannot run.
"""
