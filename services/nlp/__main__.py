from services.nlp.app import main

main()
