"""Query HAIF from a Ray job through the in-cluster SDK and print the answer as JSON.

    ray job submit --working-dir . -- python examples/job_query.py --api-key KEY --model echo --prompt "..."
"""

from __future__ import annotations

import argparse
import json

import ray

from haif.sdk import HandleClient


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--model", default="echo")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--app-name", default="haif")
    args = parser.parse_args()
    ray.init(address="auto")
    client = HandleClient(args.api_key, app_name=args.app_name)
    reply = client.completions(
        {"model": args.model, "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0}
    )
    print("RESULT " + json.dumps({"text": reply.choices[0].text, "usage": reply.usage.model_dump()}))


if __name__ == "__main__":
    main()
