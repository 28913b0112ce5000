from pairfarm.cli import main

main()
