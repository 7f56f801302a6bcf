import tmbx  # noqa: F401  (float64 on for every test)
