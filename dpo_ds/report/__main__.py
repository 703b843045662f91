from dpo_ds.report.plot import main

main()
