import os
import sys

# Tests import the top-level scripts (model, balora, train_nlg, ...) as modules.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
