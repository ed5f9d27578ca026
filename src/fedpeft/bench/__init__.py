"""`fedpeft bench`: a method matrix on one federation, resumable, reported as results.md/.csv/.png.

suites.py holds the suite definitions (data only), matrix.py runs them into
OUT/<suite>/<label>-seed<k>/ and skips finished runs, report.py turns the run folders into tables.
"""
