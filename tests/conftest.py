import os

# Tiered compilation (tmbx/_tiered.py) would compile every slow-ish small model
# again, fully optimized, in a background thread: CPU that tests nothing here
# (test_tiered_compilation turns it back on) on a 2-core CI machine.
os.environ.setdefault("TMBX_TIERED", "0")

import tmbx  # noqa: F401  (float64 on for every test)
