"""One lock for every `from_pretrained` in the process.

transformers' model loading is not thread-safe: it temporarily patches process-global state
(weight initialisation, default device/dtype contexts). The gateway loads the chat model and the
embedding model on two worker threads at start; unserialised, the second load can leave weights
uninitialised (measured: garbage tokens and log-prob 0.0 from the tiny test model after a few
concurrent loads). Loads are rare and short after the first start, so a plain lock costs nothing.
"""

import threading

MODEL_LOAD_LOCK = threading.Lock()
