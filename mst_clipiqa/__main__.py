from mst_clipiqa.cli.commands import main

main()
