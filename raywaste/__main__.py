from raywaste.cli import main

main()
