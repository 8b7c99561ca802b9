"""What every engine that runs as an HTTP server beside us shares (vLLM, llama.cpp's llama-server).

supervisor.py (a child process started, watched, restarted and stopped by us), backend.py (admission, capacity,
health, every stream failed when the engine goes down), stream.py (one sequence: a task feeding a queue,
cancel/abort, forced prefixes walked token by token), prefix.py (the forced-prefix rule), client.py (the pooled
HTTP client, the event-stream splitter, the engines' error bodies).
"""
