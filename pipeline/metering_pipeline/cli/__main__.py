from metering_pipeline.cli import main

main()
