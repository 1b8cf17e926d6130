from services.llm.app import main

# vLLM starts its engine in child processes that may import this module again; only the parent serves.
if __name__ == "__main__":
    main()
