"""The load test the e2e pods run: two named requests against the test's local target server."""

from locust import HttpUser, between, task


class ShopUser(HttpUser):
    wait_time = between(0.05, 0.1)

    @task(3)
    def browse(self) -> None:
        self.client.get("/")

    @task(1)
    def item(self) -> None:
        self.client.get("/item?id=42", name="/item")
