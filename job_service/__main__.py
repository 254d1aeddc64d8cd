from job_service.main import main

main()
