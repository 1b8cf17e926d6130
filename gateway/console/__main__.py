from gateway.console.app import main

main()
