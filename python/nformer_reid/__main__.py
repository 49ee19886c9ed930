"""python -m nformer_reid ... == nformer-reid ..."""
import sys

from nformer_reid.cli import main

sys.exit(main())
