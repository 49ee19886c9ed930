import sys

from nformer_bench.cli import main

sys.exit(main())
