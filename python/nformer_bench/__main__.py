from nformer_bench.cli import main

main()
