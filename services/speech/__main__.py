from services.speech.app import main

main()
