from gateway.rest.app import main

main()
