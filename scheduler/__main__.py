from scheduler.app import main

main()
