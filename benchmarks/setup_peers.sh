#!/usr/bin/env bash
# Install the benchmark peers (benchmarks/run.py skips any that is missing, with a message):
#  - R and nlme from Debian's packages (needs root: apt-get);
#  - pynlme from PyPI into its own virtual environment benchmarks/.peers/pynlme (its pins never
#    touch nlmegen's environment); PYNLME_PYTHON=/path/to/python overrides where run.py looks.
# saemix is not a Debian package and CRAN is out of reach here, so it is not installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if ! command -v Rscript >/dev/null; then
  apt-get update -q && apt-get install -y -q r-base-core r-cran-nlme
fi
Rscript -e 'library(nlme); cat("R", R.version$major, R.version$minor, "nlme", as.character(packageVersion("nlme")), "\n")'
python3 -m venv "$here/.peers/pynlme"
"$here/.peers/pynlme/bin/pip" install -q pynlme
"$here/.peers/pynlme/bin/python" -c 'import pynlme; print("pynlme", pynlme.__version__)'
