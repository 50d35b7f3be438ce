"""End-to-end benchmark (issue 6): the same command as ``adaattn bench``.

    python3 benchmarks/run.py --preset issue6 --out out/          # the H100 target table
    python3 benchmarks/run.py --models gpt,llama-eager --seq 1k,4k --mode both --out out/
    python3 benchmarks/run.py --list
    python3 benchmarks/run.py --from-json out/results.json        # redraw table and plots

The logic lives in adaattn_compile/bench.py; the flags in adaattn_compile/cli.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adaattn_compile.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
