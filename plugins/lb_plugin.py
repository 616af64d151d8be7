from twisted.application.service import ServiceMaker

lb = ServiceMaker("lb", "lb.tap", "Consul-native TCP load balancer", "lb")
