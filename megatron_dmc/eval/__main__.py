from megatron_dmc.eval.cli import main

main()
