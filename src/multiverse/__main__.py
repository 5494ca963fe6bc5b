from multiverse.main import main

main()
