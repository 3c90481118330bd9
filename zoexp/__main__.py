from zoexp.cli import main

main()
