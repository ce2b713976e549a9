"""One script per pipeline stage, run by DVC as `python -m stages.NAME` from the repository root, so that
`import charlm` loads the library of the checkout being run (a queued experiment's own copy, not the editable install).
"""
