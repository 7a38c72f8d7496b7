from paramscope.cli import main

main()
