from services.vision.app import main

main()
