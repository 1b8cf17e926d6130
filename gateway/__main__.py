from gateway.workers import main

main()
