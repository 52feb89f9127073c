import os
import sys

# One intra-op thread per test process (inherited by the DDP and sandbox subprocesses): the tiny
# models here are overhead-bound, and two processes x two threads on a 2-core CI machine thrash.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Tests import the top-level scripts (model, balora, train_nlg, ...) as modules.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
