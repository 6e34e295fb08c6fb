from mst_clipiqa.cli import main

main()
