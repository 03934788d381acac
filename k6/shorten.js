// Admin creates at a fixed arrival rate, through the gateway.
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e ADMIN_API_KEY=... k6/shorten.js
// Options (env): RATE per second (40, under the gateway's 50 r/s admin
// limit per client address), DURATION (30s), P99_MS (200).
import http from 'k6/http';
import { check, fail } from 'k6';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8080';
const KEY = __ENV.ADMIN_API_KEY;

export const options = {
  scenarios: {
    creates: {
      executor: 'constant-arrival-rate',
      rate: parseInt(__ENV.RATE || '40', 10),
      timeUnit: '1s',
      duration: __ENV.DURATION || '30s',
      preAllocatedVUs: 16,
      maxVUs: 64,
    },
  },
  thresholds: {
    http_req_failed: ['rate<0.001'],
    http_req_duration: [`p(99)<${__ENV.P99_MS || '200'}`],
  },
};

export function setup() {
  if (!KEY) fail('set ADMIN_API_KEY');
}

export default function () {
  const res = http.post(
    `${BASE}/shorten`,
    JSON.stringify({ url: `https://example.com/k6/${__VU}/${__ITER}` }),
    { headers: { Authorization: `Bearer ${KEY}`, 'Content-Type': 'application/json' } },
  );
  check(res, { created: (r) => r.status === 201 && r.json('code') !== undefined });
}
