"""The explorer from a source checkout: ``streamlit run apps/explorer.py -- --runs runs``.

The app itself lives in the package (``circuitq/app/explorer.py``), so ``circuitq app`` works from
an installed circuitq; this file only runs it."""
from circuitq.app.explorer import main

main()
