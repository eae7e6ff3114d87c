from detaudit.cli.app import main

main()
