from flotilla.cli import main

if __name__ == "__main__":  # not when a spawned process (the bench's limit) imports it
    main()
