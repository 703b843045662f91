from dpo_ds.plan.cli import main

main()
